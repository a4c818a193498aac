"""Shared fixtures: tiny random checkpoints and LoRA adapters built in ``tmp_path``, offline.

``make_checkpoint`` and ``make_lora`` return factories so a test can build several models (a
base, fine-tunes of it, adapters on it) with explicit seeds. Each is a few kB, built in a few ms.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Tests never touch the network: set before transformers / huggingface_hub read their constants.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

if importlib.util.find_spec("mergearena") is None:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import pytest  # noqa: E402
import torch  # noqa: E402

# Words of the tiny tokenizer; the models' vocab_size is len(TOKENIZER_VOCAB).
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
WORDS = (
    "the a an of to and in is it that was for on are with as he she they at be this have from "
    "or one had by word but not what all were we when your can said there use each which do how "
    "if will up other about out many then them these so some her would make like him into time "
    "has look two more write go see number no way could people my than first water been call who "
    "its now find long down day did get come made may part yes"
).split()
TOKENIZER_VOCAB = SPECIAL_TOKENS + WORDS

_names = itertools.count()


def _tiny_config(kind: str) -> Any:
    from transformers import GPT2Config, LlamaConfig

    vocab_size = len(TOKENIZER_VOCAB)
    if kind == "llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=3,
        )
    if kind == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=128,
            bos_token_id=1,
            eos_token_id=2,
        )
    raise ValueError(f"unknown tiny model kind {kind!r}: use 'llama' or 'gpt2'")


_TOKENIZER: Any = None


def _tiny_tokenizer() -> Any:
    """A real word-level fast tokenizer over ``TOKENIZER_VOCAB`` (built once per session)."""
    global _TOKENIZER
    if _TOKENIZER is None:
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        vocab = {token: index for index, token in enumerate(TOKENIZER_VOCAB)}
        backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
        _TOKENIZER = PreTrainedTokenizerFast(
            tokenizer_object=backend,
            unk_token="<unk>",
            bos_token="<s>",
            eos_token="</s>",
            pad_token="<pad>",
        )
    return _TOKENIZER


def _save_model(model: Any, directory: Path, shards: int, dtype: torch.dtype) -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()
    model = model.to(dtype)
    total_bytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    # Greedy sharding fills each shard up to the limit, so this yields `shards` files or one more.
    max_shard_size = total_bytes + 1 if shards <= 1 else max(1, total_bytes // shards)
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    _tiny_tokenizer().save_pretrained(directory)


@pytest.fixture
def make_checkpoint(tmp_path: Path) -> Callable[..., Path]:
    """Factory for tiny random Llama / GPT-2 checkpoints (safetensors + config + tokenizer)."""

    def make(
        kind: str = "llama",
        seed: int = 0,
        *,
        base: Path | None = None,
        noise: float = 0.02,
        shards: int = 1,
        dtype: torch.dtype = torch.float32,
        name: str | None = None,
        vocab_size: int | None = None,
    ) -> Path:
        """``vocab_size`` overrides the tokenizer's (a model whose embeddings do not match)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        directory = tmp_path / (name or f"{kind}-{seed}-{next(_names)}")
        if base is None:
            config = _tiny_config(kind)
            if vocab_size is not None:
                config.vocab_size = vocab_size
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config)
        else:
            if vocab_size is not None:
                raise ValueError("a fine-tune keeps its base's vocab_size; pass base or vocab_size")
            # A "fine-tune" of `base`: its weights plus seeded Gaussian noise.
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
            model.load_state_dict(_read_weights(base), strict=False)
            generator = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for parameter in model.parameters():
                    step = torch.randn(parameter.shape, generator=generator)
                    parameter.add_(noise * step.to(parameter.dtype))
        _save_model(model, directory, shards, dtype)
        return directory

    return make


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        weights.update({name: t.float() for name, t in load_file(file).items()})
    return weights


@pytest.fixture
def make_lora(tmp_path: Path) -> Callable[..., Path]:
    """Factory for PEFT LoRA adapters on a ``make_checkpoint`` base, with random non-zero lora_B."""

    def make(
        base_dir: Path,
        seed: int = 0,
        *,
        r: int = 4,
        alpha: float = 8,
        targets: tuple[str, ...] = ("q_proj", "v_proj"),
        rslora: bool = False,
        rank_pattern: dict[str, int] | None = None,
        alpha_pattern: dict[str, float] | None = None,
        modules_to_save: list[str] | None = None,
        use_dora: bool = False,
    ) -> Path:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        config = LoraConfig(
            r=r,
            lora_alpha=alpha,
            target_modules=list(targets),
            use_rslora=rslora,
            rank_pattern=rank_pattern or {},
            alpha_pattern=alpha_pattern or {},
            modules_to_save=modules_to_save,
            fan_in_fan_out=model.config.model_type == "gpt2",  # GPT-2 uses Conv1D (in × out)
            use_dora=use_dora,
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
        )
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, parameter in peft_model.named_parameters():
                if "lora_" in name:  # lora_B starts at zero: make every delta non-trivial
                    parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
        directory = tmp_path / f"lora-{base_dir.name}-{seed}-{next(_names)}"
        peft_model.save_pretrained(directory)
        return directory

    return make


@pytest.fixture
def hf_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty Hugging Face hub cache in ``tmp_path`` (``HF_HUB_CACHE`` points at it)."""
    cache = tmp_path / "hf-hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    yield cache


# The arena's database tests run on SQLite, and on PostgreSQL where a server is given.
POSTGRES_URL = os.environ.get("MERGEARENA_TEST_POSTGRES_URL")
BOTH_DATABASES = [
    "sqlite",
    pytest.param(
        "postgresql",
        marks=pytest.mark.skipif(
            not POSTGRES_URL,
            reason="set MERGEARENA_TEST_POSTGRES_URL (scripts/start_postgres.sh) to run",
        ),
    ),
]


def empty_database(kind: str, tmp_path: Path) -> str:
    """The URL of an empty arena database of ``kind`` (``sqlite`` in ``tmp_path``, or the
    PostgreSQL server of ``MERGEARENA_TEST_POSTGRES_URL`` with its schema dropped)."""
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'arena.db'}"
    from sqlalchemy import create_engine, text

    assert POSTGRES_URL is not None
    engine = create_engine(POSTGRES_URL)
    with engine.begin() as connection:  # every test starts from an empty database
        connection.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    engine.dispose()
    return POSTGRES_URL


@contextlib.contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """Serve an ASGI app with uvicorn on a free local port; yields its URL."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def typical_value(parameter: Any) -> Any:
    """A valid value for a required method parameter, from its declared type and range."""
    if parameter.kind is bool:
        return False
    if parameter.kind is str:
        assert parameter.choices, f"{parameter.name}: a string parameter without choices"
        return parameter.choices[0]
    valid = parameter.range
    low = None if valid is None else (valid.ge if valid.ge is not None else valid.gt)
    high = None if valid is None else (valid.le if valid.le is not None else valid.lt)
    if low is not None and high is not None:
        value = low + 0.3 * (high - low)  # not the midpoint: 0.5·a + 0.5·a is exact by luck
    elif low is not None:
        value = low + 1
    elif high is not None:
        value = high - 1
    else:
        value = 1.0
    return int(value) if parameter.kind is int else float(value)
