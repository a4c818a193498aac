"""Load a checkpoint's pieces from a directory: its config, its weights in a dtype, its tokenizer,
a LoRA adapter folded in. The device and dtype names of the command line are parsed here."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from mergearena.checkpoints.lora import is_adapter_dir
from mergearena.dtypes import choose_dtype
from mergearena.errors import CheckpointError, EvaluationError


def parse_dtype(name: str, device: str | torch.device = "cpu") -> torch.dtype:
    """``float32``, ``bfloat16``, ``float16``, or ``auto`` (see ``mergearena.dtypes``)."""
    return choose_dtype(name, device).dtype


def parse_device(name: str) -> torch.device:
    """The torch device ``name`` names, refused up front when torch cannot use it."""
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
def quiet_transformers() -> Iterator[None]:
    """transformers' and PEFT's loading chatter off: their info logs, progress bars, and PEFT
    0.21's read of transformers' deprecated ``is_gradient_checkpointing`` (a FutureWarning on
    every adapter it loads, noise for a user)."""
    from transformers.utils import logging  # transformers is slow to import: only when loading

    previous = logging.get_verbosity()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
            yield
    finally:
        logging.set_verbosity(previous)


def load_model(directory: Path, dtype: torch.dtype) -> Any:
    """The checkpoint in ``directory`` (causal or seq2seq, as its config says) in ``dtype``."""
    config = _load_config(directory)
    with quiet_transformers():
        try:
            return _auto_class(config).from_pretrained(directory, dtype=dtype)
        except (OSError, ValueError) as error:
            raise CheckpointError(f"{directory}: cannot load the model: {error}") from None


def model_from_config(directory: Path, dtype: torch.dtype) -> Any:
    """A model of ``directory``'s architecture with fresh weights: a shell to load weights into."""
    config = _load_config(directory)
    with quiet_transformers():
        return _auto_class(config).from_config(config, dtype=dtype)


def load_tokenizer(directory: Path) -> Any:
    """The tokenizer saved in ``directory``."""
    from transformers import AutoTokenizer  # slow to import: only when loading

    with quiet_transformers():
        try:
            return AutoTokenizer.from_pretrained(directory)
        except (OSError, ValueError, TypeError) as error:
            raise CheckpointError(
                f"{directory}: cannot load a tokenizer ({error}); copy the base model's tokenizer "
                "files into the checkpoint directory"
            ) from None


def apply_adapter(model: Any, adapter: Path) -> Any:
    """``model`` with the PEFT adapter in ``adapter`` folded into its weights."""
    from peft import PeftModel  # slow to import: only when an adapter is loaded

    if not is_adapter_dir(adapter):
        raise CheckpointError(
            f"{adapter}: not a PEFT adapter directory (needs adapter_config.json and weights)"
        )
    with quiet_transformers():
        try:
            peft_model = PeftModel.from_pretrained(model, adapter)
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise CheckpointError(f"{adapter}: cannot apply the adapter: {error}") from None
    # Folding the adapter in gives the same outputs and runs at the base model's speed.
    return peft_model.merge_and_unload()


def _auto_class(config: Any) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM  # slow to import

    return (
        AutoModelForSeq2SeqLM
        if getattr(config, "is_encoder_decoder", False)
        else AutoModelForCausalLM
    )


def _load_config(directory: Path) -> Any:
    from transformers import AutoConfig  # slow to import: only when loading

    try:
        return AutoConfig.from_pretrained(directory)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{directory}: cannot read the model config: {error}") from None
