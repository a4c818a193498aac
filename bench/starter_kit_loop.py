"""The NeurIPS 2024 LLM Merging Competition starter kit's evaluation, decoder path, as it ships.

`starter_kit_eval(model, tokenizer, rows)` scores rows one at a time (the kit's DataLoader has
batch size 1) the way the kit's `Merges` class and its decoder functions do. This is our own
transcription, kept minimal and faithful for timing and for comparing predictions; it is not the
kit's code. What it reproduces:

Tokenizers. One tokenizer is loaded with `AutoTokenizer.from_pretrained(base,
model_max_length=None, legacy=False)` (the kit passes its `max_seq_len`, which is None) and used for
inputs; a deep copy of it is used for targets. Whichever has no pad token gets pad = eos. Inputs are
padded on the left; targets on the right, with `add_bos_token = False` and `add_eos_token = True`.
(With transformers 5 setting `add_eos_token` rebuilds the post-processor, so every answer choice
ends in EOS and that EOS is scored; with transformers 4 only Llama/Gemma fast tokenizers did that.)

Multiple choice (per row, under `torch.no_grad()`):
  1. answer choices: a string that starts with "[" is parsed with `ast.literal_eval`;
  2. the input goes through the input tokenizer, the choices through the target tokenizer, each with
     `return_tensors="pt", padding="longest", truncation="longest_first"`;
  3. one forward pass over the input with `use_cache=True`;
  4. the cache and the input mask are repeated (`repeat_interleave`) once per choice along the batch
     dimension;
  5. a second forward pass over the choice ids, with mask = [input mask, choice mask] and the
     repeated cache (positions are left to the model's default: they continue from the cache);
  6. logits in float32, shifted by one: logits[:, :-1] score ids[:, 1:] under mask[:, 1:]. So the
     first token of each choice is never scored (it is predicted by nothing: the logits of the last
     input token are not used). A choice that is one token long (with EOS: zero tokens) scores 0;
  7. score = sum of the token log-probabilities (-cross_entropy) times the mask; prediction =
     `torch.max(scores, dim=1)` index.

Generation: the input as above; `model.generate(input_ids, attention_mask,
max_new_tokens=max_gen_len, eos_token_id, pad_token_id, bos_token_id (all the input tokenizer's),
do_sample=False, return_dict_in_generate=True)`; the first input_len tokens are dropped and the
rest decoded with `batch_decode(skip_special_tokens=True)`.

The kit's tokenizing helper also makes tokenizer calls whose results nothing uses: it tokenizes a
row's `target` with the target tokenizer, and for a field a row lacks (no answer choices in a
generation row, no target in a test row) it tokenizes the previous field's text once more. Those
calls are made (and timed) here too.
"""

from __future__ import annotations

import ast
import copy
import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

TOKENIZE_KW = dict(return_tensors="pt", padding="longest", truncation="longest_first")


def make_tokenizers(tokenizer_dir_or_obj: Any) -> tuple[Any, Any]:
    """The kit's (input_tokenizer, target_tokenizer) pair.

    A path is loaded as the kit loads it; a tokenizer object is deep-copied first, so that the
    caller's object is left as it was.
    """
    if isinstance(tokenizer_dir_or_obj, (str, os.PathLike)):
        input_tok = AutoTokenizer.from_pretrained(
            os.fspath(tokenizer_dir_or_obj), model_max_length=None, legacy=False
        )
    else:
        input_tok = copy.deepcopy(tokenizer_dir_or_obj)
    target_tok = copy.deepcopy(input_tok)
    if input_tok.pad_token_id is None:
        input_tok.pad_token_id = input_tok.eos_token_id
    if target_tok.pad_token_id is None:
        target_tok.pad_token_id = target_tok.eos_token_id
    input_tok.padding_side = "left"
    target_tok.padding_side = "right"
    target_tok.add_bos_token = False
    target_tok.add_eos_token = True
    return input_tok, target_tok


def _choices_of(row: dict) -> list[str] | None:
    choices = row.get("answer_choices", row.get("choices"))
    if choices is None or choices == "" or choices == "None":
        return None
    if isinstance(choices, str) and choices[0] == "[":
        choices = ast.literal_eval(choices)
    return list(choices)


def _expand_cache(cache: Any, repeats: int) -> Any:
    """The first pass's cache, repeated `repeats` times along the batch dimension."""
    if hasattr(cache, "batch_repeat_interleave"):  # transformers >= 4.4x: a Cache object
        cache.batch_repeat_interleave(repeats)
        return cache
    # Legacy format: a tuple over layers of (key, value) tensors [batch, heads, seq, head_dim].
    return tuple(tuple(t.repeat_interleave(repeats, dim=0) for t in layer) for layer in cache)


def _tokenize_unused_fields(row: dict, target_tok: Any, choices: list[str] | None) -> None:
    """The kit's extra tokenizer calls whose results it never uses (see the module docstring).

    Its helper walks the fields input, answer_choices, target, and tokenizes the current text for
    each one, present or not: a missing field re-tokenizes the previous field's text.
    """
    previous = choices if choices else [row["input"]]
    if not choices:
        target_tok(previous, **TOKENIZE_KW)
    if row.get("target") is not None:
        target_tok([str(row["target"])], **TOKENIZE_KW)
    else:
        target_tok(previous, **TOKENIZE_KW)


def predict_multiple_choice(model, input_tok, target_tok, text: str, choices: Sequence[str]):
    """Scores (one per choice) and the predicted index, for one example."""
    device = model.device
    enc = input_tok([text], **TOKENIZE_KW)
    input_ids = enc["input_ids"].to(device)
    input_mask = enc["attention_mask"].to(device)
    enc_c = target_tok(list(choices), **TOKENIZE_KW)
    choice_ids = enc_c["input_ids"].to(device)
    choice_mask = enc_c["attention_mask"].to(device)

    first = model(input_ids=input_ids, attention_mask=input_mask, use_cache=True)
    n_choices = choice_ids.shape[0] // input_mask.shape[0]
    cache = _expand_cache(first.past_key_values, n_choices)
    mask = torch.cat([input_mask.repeat_interleave(n_choices, dim=0), choice_mask], dim=1)
    second = model(input_ids=choice_ids, attention_mask=mask, past_key_values=cache, use_cache=True)

    logits = second.logits.float()[..., :-1, :].contiguous()
    targets = choice_ids[..., 1:].contiguous()
    target_mask = choice_mask[..., 1:].contiguous()
    vocab = logits.shape[-1]
    token_logprobs = -F.cross_entropy(logits.view(-1, vocab), targets.view(-1), reduction="none")
    token_logprobs = token_logprobs.view(-1, n_choices, targets.shape[-1])
    scores = (token_logprobs * target_mask.view(-1, n_choices, targets.shape[-1])).sum(dim=2)
    _, predicted = torch.max(scores, dim=1)
    return scores[0], int(predicted[0])


def generate(model, input_tok, text: str, max_gen_len: int) -> str:
    enc = input_tok([text], **TOKENIZE_KW)
    input_ids = enc["input_ids"].to(model.device)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=enc["attention_mask"].to(model.device),
        max_new_tokens=max_gen_len,
        eos_token_id=input_tok.eos_token_id,
        pad_token_id=input_tok.pad_token_id,
        bos_token_id=input_tok.bos_token_id,
        do_sample=False,
        return_dict_in_generate=True,
    )
    new_ids = out["sequences"][:, input_ids.shape[-1] :]
    return input_tok.batch_decode(new_ids, skip_special_tokens=True)[0]


def starter_kit_eval(
    model, tokenizer_dir_or_obj: Any, rows: Iterable[dict], max_gen_len: int = 64
) -> list[dict]:
    """Evaluate `rows` one at a time as the starter kit does.

    A row has `id`, `input`, and either answer choices (`answer_choices`: a list, or a string like
    "['A', 'B']"; `choices` is accepted too) for multiple choice, or none for generation.
    `eval_type`, when present, decides instead. Returns, per row, {"id", "prediction": int,
    "scores": [float, ...]} for multiple choice and {"id", "prediction": str} for generation.
    """
    input_tok, target_tok = make_tokenizers(tokenizer_dir_or_obj)
    results = []
    with torch.no_grad():
        for row in rows:
            choices = _choices_of(row)
            eval_type = row.get("eval_type") or ("multiple_choice" if choices else "generation")
            if eval_type == "multiple_choice":
                scores, pred = predict_multiple_choice(
                    model, input_tok, target_tok, row["input"], choices
                )
                _tokenize_unused_fields(row, target_tok, choices)
                results.append({"id": row["id"], "prediction": pred, "scores": scores.tolist()})
            else:
                _tokenize_unused_fields(row, target_tok, None)
                text = generate(model, input_tok, row["input"], max_gen_len)
                results.append({"id": row["id"], "prediction": text})
    return results
