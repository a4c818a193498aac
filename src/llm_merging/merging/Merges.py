"""The starter kit's ``Merges`` base class, on mergearena's model loading and scorer.

Same attributes and methods as the starter kit, so its method files run unmodified. What differs,
and why:

- models are named by mergearena model references and resolved locally through the job's model
  policy (``llm_merging.resolution.resolve``): an unlisted or oversized model is refused, and
  nothing is downloaded (no ``HF_AUTH_TOKEN`` needed);
- a LoRA adapter is loaded as an adapter (``load_peft_weights`` + ``PeftConfig``) whenever
  ``is_peft`` is set *or* the reference is an adapter directory: the starter kit's ``LlamaAvg``
  lists adapters without setting ``is_peft``;
- ``predict_multiple_choice`` and ``generate`` use mergearena's batched scorer with the
  ``starter-kit`` multiple-choice rule, which reproduces the starter kit's decoder functions.

A method class that overrides ``predict_multiple_choice`` or ``generate`` makes its own
predictions in the arena, called as the starter kit's evaluation loop called them (one example
per batch; the batch layout and return values are in ``mergearena.arena.runner``'s docstring);
the arena scores the rows of a type it does not override with its own batched scorer.
"""

from __future__ import annotations

import ast
import copy
from pathlib import Path
from typing import Any

import torch

from llm_merging import resolution
from mergearena.evaluation.tasks import DEFAULT_MAX_NEW_TOKENS

# The starter kit loads models in the default dtype of its transformers release: float32.
LOAD_DTYPE = torch.float32


class Merges:
    def __init__(self, name: str) -> None:
        self.name = name

        self.list_models: list[tuple[str, str | None]] | None = None

        self.loaded_models: dict[str, dict[str, torch.Tensor]] | None = None
        self.loaded_configs: dict[str, Any] | None = None
        self.base_model: Any = None
        self.tokenizer: Any = None
        self.input_tokenizer: Any = None
        self.target_tokenizer: Any = None

        self.base_model_name: str | None = None
        self.base_model_revision_id: str | None = None
        self.is_peft = False

        self.max_seq_len: int | None = None
        self.max_gen_len: int | None = None

        self.device: torch.device | None = None
        self.architecture: str | None = None  # "decoder" or "encoder_decoder"

        self.merged_model: dict[str, torch.Tensor] | None = None

    def get_name(self) -> str:
        return self.name

    def get_model_config(self) -> Any:
        raise NotImplementedError

    # ----------------------------------------------------------------------------------- loading

    def _auto_class(self) -> Any:
        from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

        if self.architecture == "encoder_decoder":
            return AutoModelForSeq2SeqLM
        if self.architecture == "decoder":
            return AutoModelForCausalLM
        raise NotImplementedError(
            f"Architecture not implemented {self.architecture!r}: set self.architecture to "
            "'decoder' or 'encoder_decoder' in your method's __init__"
        )

    def _load_full_model(self, path: Path) -> Any:
        model = self._auto_class().from_pretrained(path, dtype=LOAD_DTYPE)
        return model.to(self.device) if self.device is not None else model

    def _load_base_model(self) -> None:
        path = resolution.resolve(self.base_model_name, self.base_model_revision_id)
        self.base_model = self._load_full_model(path)

    def _load_tokenizer(self) -> None:
        from transformers import AutoTokenizer

        path = resolution.resolve(self.base_model_name, self.base_model_revision_id)
        options: dict[str, Any] = {"legacy": False}
        if self.max_seq_len is not None:
            options["model_max_length"] = self.max_seq_len
        self._auto_class()  # the starter kit refuses an unknown architecture here too
        if self.architecture == "encoder_decoder":
            if self.tokenizer is None:
                self.tokenizer = AutoTokenizer.from_pretrained(path, **options)
            return
        if self.input_tokenizer is not None and self.target_tokenizer is not None:
            return
        self.input_tokenizer = AutoTokenizer.from_pretrained(path, **options)
        self.target_tokenizer = copy.deepcopy(self.input_tokenizer)
        # Padding is masked out, so EOS is a safe pad token when there is none.
        for tokenizer in (self.input_tokenizer, self.target_tokenizer):
            if tokenizer.pad_token_id is None:
                tokenizer.pad_token_id = tokenizer.eos_token_id
        # Prompts: BOS, left padded. Choices and targets: EOS and no BOS, right padded.
        self.input_tokenizer.padding_side = "left"
        self.target_tokenizer.padding_side = "right"
        self.target_tokenizer.add_bos_token = False
        self.target_tokenizer.add_eos_token = True

    def _load_huggingface_models_and_configs(self) -> None:
        """Fill ``loaded_models`` (name → state dict) and ``loaded_configs`` (name → config).

        An adapter's state dict holds its LoRA weights as ``load_peft_weights`` returns them
        (``base_model.model....lora_A.weight``) and its config is a ``PeftConfig``; a full model's
        state dict holds all its weights and its config is the model's ``AutoConfig``.
        """
        from peft import PeftConfig, load_peft_weights
        from transformers import AutoConfig

        from mergearena.checkpoints import is_adapter_dir

        assert self.list_models, "List of models must include at least 1 model"
        self.loaded_models = {} if self.loaded_models is None else self.loaded_models
        self.loaded_configs = {} if self.loaded_configs is None else self.loaded_configs
        parameter_names = None
        for model_name, revision_id in self.list_models:
            path = resolution.resolve(model_name, revision_id)
            if self.is_peft or is_adapter_dir(path):
                device = str(self.device) if self.device is not None else None
                parameters = load_peft_weights(str(path), device=device)
                config = PeftConfig.from_pretrained(str(path))
            else:
                parameters = self._load_full_model(path).state_dict()
                config = AutoConfig.from_pretrained(path)
            if parameter_names is None:
                parameter_names = set(parameters)
            if parameter_names != set(parameters):
                print(f"WARNING: parameters in {model_name} do not match {self.list_models[0]}")
            self.loaded_models[model_name] = parameters
            self.loaded_configs[model_name] = config

    def merge(self) -> Any:
        raise NotImplementedError

    def save_model(self, output_dir: str) -> None:
        """Save ``merged_model`` (a state dict) as the starter kit does, to ``safetensor.pt``."""
        from safetensors.torch import save_file

        assert self.merged_model is not None, "Merged model is empty"
        tensors = {name: tensor.contiguous() for name, tensor in self.merged_model.items()}
        save_file(tensors, str(Path(output_dir) / "safetensor.pt"))

    # -------------------------------------------------------------------------------- prediction

    def _scorer(self) -> Any:
        from mergearena.models import LanguageModel

        assert self.base_model is not None
        if self.architecture == "encoder_decoder":
            if self.tokenizer is None:
                self._load_tokenizer()
            tokenizer = self.tokenizer
        else:
            if self.input_tokenizer is None:
                self._load_tokenizer()
            tokenizer = self.input_tokenizer
        return LanguageModel(self.base_model, tokenizer, name=self.name)

    def predict_multiple_choice(self, batch: dict[str, list]) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted choice per example, log-probability of each choice), for a batch of
        ``{"input": [...], "answer_choices": [...]}`` (choices as lists or list literals)."""
        from mergearena.evaluation import encode_choices, encode_prompts, score_choices

        lm = self._scorer()
        choices = [
            ast.literal_eval(item) if isinstance(item, str) else list(item)
            for item in batch["answer_choices"]
        ]
        prompts = encode_prompts(lm, [str(text) for text in batch["input"]])
        # The kit scores this whole batch at once, so it fails only where every choice of the
        # batch is one token long, not where one row's are.
        encoded = encode_choices(
            lm,
            [[str(c) for c in group] for group in choices],
            "starter-kit",
            [str(i) for i in batch["id"]] if "id" in batch else None,
            kit_batch_size=len(prompts),
        )
        scored = score_choices(lm, prompts, encoded, rule="starter-kit", batch_size=len(prompts))
        predictions = torch.tensor([result.prediction for result in scored])
        return predictions, torch.tensor([list(result.scores) for result in scored])

    def generate(self, batch: dict[str, list]) -> tuple[list[list[int]], list[str]]:
        """(token ids, generated text) for a batch of ``{"input": [...]}``: greedy, at most
        ``max_gen_len`` new tokens. The ids are the prompt's followed by the generated text
        encoded again (the starter kit returns the raw generated ids; nothing it ships reads them).
        """
        from mergearena.evaluation import encode_prompts
        from mergearena.evaluation import generate as generate_texts

        lm = self._scorer()
        prompts = encode_prompts(lm, [str(text) for text in batch["input"]])
        texts = generate_texts(
            lm,
            prompts,
            max_new_tokens=self.max_gen_len or DEFAULT_MAX_NEW_TOKENS,
            batch_size=len(prompts),
        )
        continuations = lm.tokenizer(texts, add_special_tokens=False)["input_ids"]
        ids = [prompt + list(more) for prompt, more in zip(prompts, continuations, strict=True)]
        return ids, texts
