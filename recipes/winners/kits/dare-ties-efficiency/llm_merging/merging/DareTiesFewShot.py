"""Efficiency track winner (Zhang, Ding, Wu, Yang) on the zoo: DARE-TIES over the five LoRA
experts, and every prompt after three solved examples; a choice wins by the log-likelihood of its
tokens (the kit's own rule leaves one-token choices, the zoo's labels, with empty scores). See
recipes/winners/dare-ties-efficiency.yaml."""

import ast
from pathlib import Path

import torch

from llm_merging import resolution
from llm_merging.merging.Merges import Merges
from mergearena.engine import merge_to_state_dict

RECIPE = Path(__file__).with_name("recipe.yaml")
EXPERTS = ["arithmetic", "question_type", "sentiment", "spam", "subject"]
SOLVED = (
    "Review: An instant classic.\n"
    "Is the sentiment of this movie review positive or negative?\nAnswer: positive\n\n"
    "Message: WINNER! Claim your free prize now, call 09061701461.\n"
    "Is this message spam?\nAnswer: yes\n\n"
    "Question: What is 6 * 7?\nAnswer: 42\n\n"
)


class DareTiesFewShot(Merges):
    def __init__(self, name):
        super().__init__(name)
        self.list_models = [(f"zoo:{expert}-lora", None) for expert in EXPERTS]
        self.base_model_name = "zoo:smollm2-135m"
        self.base_model_revision_id = None
        self.is_peft = True
        self.max_seq_len = None
        self.max_gen_len = 8
        self.architecture = "decoder"

    def merge(self):
        weights = merge_to_state_dict(
            RECIPE, device=str(self.device or "cpu"), resolve=resolution.resolve
        )
        self._load_base_model()
        missing, unexpected = self.base_model.load_state_dict(weights, strict=False)
        assert not unexpected and all(name.startswith("lm_head") for name in missing), missing
        return self.base_model

    def _log_likelihood(self, prompt: list[int], answer: list[int]) -> float:
        ids = torch.tensor([prompt + answer], device=self.base_model.device)
        logits = self.base_model(ids).logits[0, len(prompt) - 1 : -1].log_softmax(-1)
        targets = torch.tensor(answer, device=logits.device)[:, None]
        return logits.gather(1, targets).sum().item()

    def predict_multiple_choice(self, batch):
        self._load_tokenizer()
        tokenizer = self.input_tokenizer
        predictions = []
        for text, choices in zip(batch["input"], batch["answer_choices"], strict=True):
            prompt = tokenizer(SOLVED + str(text))["input_ids"]
            scores = []
            for choice in ast.literal_eval(choices):
                answer = tokenizer(str(choice), add_special_tokens=False)["input_ids"]
                scores.append(self._log_likelihood(prompt, answer))
            predictions.append(max(range(len(scores)), key=scores.__getitem__))
        return torch.tensor(predictions), None

    def generate(self, batch):
        return super().generate({**batch, "input": [SOLVED + str(t) for t in batch["input"]]})
