"""A model and its tokenizer, ready to score: from disk, from a state dict, or base + adapter."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergearena.dtypes import choose_dtype
from mergearena.errors import CheckpointError, EvaluationError

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


def parse_dtype(name: str, device: str | torch.device = "cpu") -> torch.dtype:
    """``float32``, ``bfloat16``, ``float16``, or ``auto`` (see ``mergearena.dtypes``)."""
    return choose_dtype(name, device).dtype


def parse_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise EvaluationError(
            f"device {name!r} is not a torch device (cpu, cuda, cuda:1...)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvaluationError(f"device {name!r} asked for, but torch sees no CUDA device")
    return device


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' and PEFT's loading chatter off: their info logs, progress bars, and PEFT
    0.21's read of transformers' deprecated ``is_gradient_checkpointing`` (a FutureWarning on
    every adapter it loads, noise for a user)."""
    from transformers.utils import logging

    previous = logging.get_verbosity()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
            yield
    finally:
        logging.set_verbosity(previous)


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
        a base with LoRA experts beside it) loads as ``mergearena.routed`` says.
        """
        from mergearena.checkpoints.lora import LoraAdapter, is_adapter_dir
        from mergearena.checkpoints.refs import resolve_model_ref
        from mergearena.routed.manifest import is_routed_dir

        directory = resolve_model_ref(str(ref), allow_download=allow_download)
        if is_routed_dir(directory):
            from mergearena.routed.model import load_routed

            return load_routed(
                directory,
                adapter=adapter,
                device=device,
                dtype=dtype,
                allow_download=allow_download,
            )
        if adapter is None and is_adapter_dir(directory):
            with LoraAdapter.open(directory) as found:
                base = found.base_model_name_or_path
            if not base:
                raise CheckpointError(f"{ref}: a LoRA adapter that names no base model")
            adapter, directory = directory, resolve_model_ref(base, allow_download=allow_download)
        torch_device, torch_dtype = parse_device(device), parse_dtype(dtype, device)
        model = _load_model(directory, torch_dtype)
        if adapter is not None:
            adapter_dir = resolve_model_ref(str(adapter), allow_download=allow_download)
            model = _apply_adapter(model, adapter_dir)
        tokenizer = _load_tokenizer(directory)
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
        from mergearena.checkpoints.refs import resolve_model_ref

        directory = resolve_model_ref(str(base))
        model = _model_from_config(directory, parse_dtype(dtype, device))
        lm = cls(model.to(parse_device(device)), _load_tokenizer(directory), name=name)
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


def _auto_class(config: Any) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return (
        AutoModelForSeq2SeqLM
        if getattr(config, "is_encoder_decoder", False)
        else AutoModelForCausalLM
    )


def _load_config(directory: Path) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(directory)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{directory}: cannot read the model config: {error}") from None


def _load_model(directory: Path, dtype: torch.dtype) -> Any:
    config = _load_config(directory)
    with _quiet_transformers():
        try:
            return _auto_class(config).from_pretrained(directory, dtype=dtype)
        except (OSError, ValueError) as error:
            raise CheckpointError(f"{directory}: cannot load the model: {error}") from None


def _model_from_config(directory: Path, dtype: torch.dtype) -> Any:
    config = _load_config(directory)
    with _quiet_transformers():
        return _auto_class(config).from_config(config, dtype=dtype)


def _load_tokenizer(directory: Path) -> Any:
    from transformers import AutoTokenizer

    with _quiet_transformers():
        try:
            return AutoTokenizer.from_pretrained(directory)
        except (OSError, ValueError, TypeError) as error:
            raise CheckpointError(
                f"{directory}: cannot load a tokenizer ({error}); copy the base model's tokenizer "
                "files into the checkpoint directory"
            ) from None


def _apply_adapter(model: Any, adapter: Path) -> Any:
    from peft import PeftModel

    from mergearena.checkpoints.lora import is_adapter_dir

    if not is_adapter_dir(adapter):
        raise CheckpointError(
            f"{adapter}: not a PEFT adapter directory (needs adapter_config.json and weights)"
        )
    with _quiet_transformers():
        try:
            peft_model = PeftModel.from_pretrained(model, adapter)
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise CheckpointError(f"{adapter}: cannot apply the adapter: {error}") from None
    # Folding the adapter in gives the same outputs and runs at the base model's speed.
    return peft_model.merge_and_unload()
