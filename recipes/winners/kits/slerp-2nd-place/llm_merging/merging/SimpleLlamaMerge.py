"""Performance track, 2nd place ("Simple Llama Merge", Zhang), on the zoo: SLERP of two full
fine-tunes with per-depth gradients, and their inference: chain of thought for multiple choice,
a one-shot chat turn for generation. See recipes/winners/slerp-2nd-place.yaml."""

import ast
import re
from pathlib import Path

import torch

from llm_merging import resolution
from llm_merging.merging.Merges import Merges
from mergearena.engine import merge_to_state_dict

RECIPE = Path(__file__).with_name("recipe.yaml")
LETTERS = "ABCDEFGHIJ"
WORKED_EXAMPLE = (
    "Question: Is the sentiment of this review positive or negative? Review: A waste of time.\n"
    "(A) positive\n(B) negative\n"
    "Answer: Let's think step by step. The reviewer calls the film a waste of time, which is a "
    "complaint. The answer is (B).\n\n"
)
CHAT_EXAMPLE = [
    {"role": "user", "content": "Question: What is 12 + 7?\nAnswer:"},
    {"role": "assistant", "content": "19"},
]


def read_letter(reply: str, count: int) -> int | None:
    """The chosen option's index in a reasoning ``reply``, as the 2nd place read it."""
    letters = LETTERS[:count]
    for pattern in (rf"answer is \(?([{letters}])\)?", rf"Answer: ?\(?([{letters}])\)?"):
        found = re.search(pattern, reply)
        if found:
            return letters.index(found.group(1))
    standalone = re.findall(rf"\b([{letters}])\b", reply)
    return letters.index(standalone[-1]) if standalone else None


class SimpleLlamaMerge(Merges):
    def __init__(self, name):
        super().__init__(name)
        self.list_models = [("zoo:question_type", None), ("zoo:sentiment", None)]
        self.base_model_name = "zoo:question_type"
        self.base_model_revision_id = None
        self.is_peft = False
        self.max_seq_len = None
        self.max_gen_len = 48  # theirs: 512, for an 8B model that reasons at length
        self.architecture = "decoder"

    def merge(self):
        weights = merge_to_state_dict(
            RECIPE, device=str(self.device or "cpu"), resolve=resolution.resolve
        )
        self._load_base_model()
        missing, unexpected = self.base_model.load_state_dict(weights, strict=False)
        assert not unexpected and all(name.startswith("lm_head") for name in missing), missing
        return self.base_model

    def _greedy(self, prompt_ids: list[int]) -> str:
        tokenizer = self.input_tokenizer
        ids = torch.tensor([prompt_ids], device=self.base_model.device)
        out = self.base_model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=self.max_gen_len,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    def predict_multiple_choice(self, batch):
        self._load_tokenizer()
        predictions = []
        for text, choices in zip(batch["input"], batch["answer_choices"], strict=True):
            options = [str(choice).strip() for choice in ast.literal_eval(choices)]
            lettered = "".join(f"({LETTERS[k]}) {option}\n" for k, option in enumerate(options))
            question = f"Question: {text}\n{lettered}Answer: Let's think step by step."
            prompt_ids = self.input_tokenizer(WORKED_EXAMPLE + question)["input_ids"]
            choice = read_letter(self._greedy(prompt_ids), len(options))
            predictions.append(0 if choice is None else choice)  # no letter: the first option
        return torch.tensor(predictions), None

    def generate(self, batch):
        self._load_tokenizer()
        texts = []
        for text in batch["input"]:
            messages = [*CHAT_EXAMPLE, {"role": "user", "content": str(text)}]
            ids = self.input_tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False
            )
            texts.append(self._greedy(list(ids)))
        return None, texts
