"""A model and its tokenizer, ready to score: from disk, from a state dict, or base + adapter."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergearena.checkpoints.lora import LoraAdapter, is_adapter_dir
from mergearena.checkpoints.refs import resolve_model_ref
from mergearena.checkpoints.routed import is_routed_dir
from mergearena.errors import CheckpointError, EvaluationError
from mergearena.models.loading import (
    apply_adapter,
    load_model,
    load_tokenizer,
    model_from_config,
    parse_device,
    parse_dtype,
)

# Tokenizer classes (without "Fast") whose add_eos_token attribute worked in transformers 4.40-4.44.
EOS_APPENDING_TOKENIZERS = frozenset(
    {
        "LlamaTokenizer",
        "CodeLlamaTokenizer",
        "GemmaTokenizer",
        "GPTNeoXTokenizer",
        "CohereTokenizer",
    }
)


@dataclass
class LanguageModel:
    """A causal (decoder) or seq2seq model with its tokenizer, in eval mode on one device."""

    model: Any
    tokenizer: Any
    name: str = "model"
    eos_rule: bool | None = None  # override of starter_kit_appends_eos

    def __post_init__(self) -> None:
        self.model.eval()
        tokenizer = self.tokenizer
        if tokenizer.pad_token_id is None:
            # As the starter kit does: padding is masked out, so EOS is a safe pad token.
            if tokenizer.eos_token_id is None:
                raise EvaluationError(
                    f"{self.name}: the tokenizer has neither a pad nor an EOS token; "
                    "set tokenizer.pad_token before evaluating"
                )
            tokenizer.pad_token_id = tokenizer.eos_token_id

    @property
    def is_seq2seq(self) -> bool:
        return bool(getattr(self.model.config, "is_encoder_decoder", False))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def starter_kit_appends_eos(self) -> bool:
        """Whether the starter kit's choice tokenizer appended EOS for this tokenizer.

        The starter kit sets ``add_eos_token = True`` on a copy of the tokenizer. In the
        transformers releases of the competition (4.40-4.44) only the Llama family's tokenizers
        (and GPT-NeoX's, Gemma's, Cohere's) honoured that attribute; GPT-2-style tokenizers
        ignored it. Newer releases honour it everywhere, so the rule is decided here by class,
        which keeps published starter-kit numbers reproducible. ``eos_rule`` overrides it.
        """
        if self.eos_rule is not None:
            return self.eos_rule
        if self.tokenizer.eos_token_id is None:
            return False
        name = type(self.tokenizer).__name__.removesuffix("Fast")
        return name in EOS_APPENDING_TOKENIZERS

    # ------------------------------------------------------------------ constructors

    @classmethod
    def load(
        cls,
        ref: str | Path,
        *,
        adapter: str | Path | None = None,
        device: str = "cpu",
        dtype: str = "auto",
        allow_download: bool = False,
    ) -> LanguageModel:
        """Load a checkpoint (a directory, ``zoo:NAME`` or a cached hub id), optionally + LoRA.

        ``adapter`` is a model reference too. A ``ref`` that is itself an adapter loads on the
        base model its ``adapter_config.json`` names. A routed model's directory (``routed.json``:
        a base with LoRA experts beside it) loads as ``mergearena.models.routed`` says.
        """
        directory = resolve_model_ref(str(ref), allow_download=allow_download)
        if is_routed_dir(directory):
            # models.routed imports transformers (its cache class): only for a routed model.
            from mergearena.models.routed import load_routed

            if adapter is not None:
                raise CheckpointError(
                    f"{directory} is a routed model, whose experts are its adapters; drop "
                    "--adapter, or rebuild it with `mergearena route` and that adapter as one "
                    "more --expert"
                )
            model, tokenizer = load_routed(
                directory, device=device, dtype=dtype, allow_download=allow_download
            )
            return cls(model, tokenizer, name=str(directory))
        if adapter is None and is_adapter_dir(directory):
            with LoraAdapter.open(directory) as found:
                base = found.base_model_name_or_path
            if not base:
                raise CheckpointError(f"{ref}: a LoRA adapter that names no base model")
            adapter, directory = directory, resolve_model_ref(base, allow_download=allow_download)
        torch_device, torch_dtype = parse_device(device), parse_dtype(dtype, device)
        model = load_model(directory, torch_dtype)
        if adapter is not None:
            adapter_dir = resolve_model_ref(str(adapter), allow_download=allow_download)
            model = apply_adapter(model, adapter_dir)
        tokenizer = load_tokenizer(directory)
        return cls(model.to(torch_device), tokenizer, name=str(ref))

    @classmethod
    def from_state_dict(
        cls,
        base: str | Path,
        state_dict: Mapping[str, torch.Tensor],
        *,
        device: str = "cpu",
        dtype: str = "auto",
        name: str = "merged",
    ) -> LanguageModel:
        """A model with ``base``'s config and tokenizer and the given weights, never written."""
        directory = resolve_model_ref(str(base))
        model = model_from_config(directory, parse_dtype(dtype, device))
        lm = cls(model.to(parse_device(device)), load_tokenizer(directory), name=name)
        lm.load_weights(state_dict, source=str(directory))
        return lm

    def load_weights(self, state_dict: Mapping[str, torch.Tensor], *, source: str = "") -> None:
        """Replace every weight in place with ``state_dict``'s (converted to the model's dtype and
        device): a search scores one candidate after another in the same model."""
        model = self.model
        result = model.load_state_dict(dict(state_dict), strict=False)
        tied = set(getattr(model, "_tied_weights_keys", None) or [])
        missing = [k for k in result.missing_keys if k not in tied]
        if missing or result.unexpected_keys:
            raise CheckpointError(
                f"{self.name}: the state dict does not fit {source or 'the model'}'s architecture "
                f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})"
            )
        if hasattr(model, "tie_weights"):
            model.tie_weights()
